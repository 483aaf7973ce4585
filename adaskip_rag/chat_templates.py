"""The default model's chat template with tool calling.

The bundled SmolLM2-135M-Instruct template is plain ChatML without tools. This one renders exactly the same text
for conversations without tools, and adds the usual ChatML tool format: the tools' JSON schemas in the system
turn inside ``<tools></tools>``, assistant calls as ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``
(what :func:`adaskip_rag.constrained.tool_grammar` generates) and tool results as ``<tool_response>`` blocks in
a user turn.
"""

DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

SMOLLM2_TOOLS = (
    "{%- set tool_text = '' -%}"
    "{%- if tools -%}"
    "{%- set ns = namespace(schemas='') -%}"
    "{%- for tool in tools -%}{%- set ns.schemas = ns.schemas + '\\n' + (tool | tojson) -%}{%- endfor -%}"
    "{%- set tool_text = '\\n\\n# Tools\\n\\nYou may call one or more of these functions to answer the user. '"
    " + 'Their JSON schemas are inside <tools></tools>:\\n<tools>' + ns.schemas + '\\n</tools>\\n\\n'"
    " + 'To call a function, answer with its name and arguments as a JSON object inside <tool_call></tool_call>:'"
    ' + \'\\n<tool_call>\\n{"name": <function name>, "arguments": <arguments object>}\\n</tool_call>\' -%}'
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\n" + DEFAULT_SYSTEM + "' + tool_text + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- if loop.first and message['role'] == 'system' -%}"
    "{{- '<|im_start|>system\\n' + message['content'] + tool_text + '<|im_end|>\\n' -}}"
    "{%- elif message['role'] == 'assistant' and message['tool_calls'] is defined and message['tool_calls'] -%}"
    "{{- '<|im_start|>assistant\\n' + (message['content'] or '') -}}"
    "{%- for call in message['tool_calls'] -%}"
    "{%- set function = call['function'] if call['function'] is defined else call -%}"
    "{%- set arguments = function['arguments'] if function['arguments'] is string"
    " else function['arguments'] | tojson -%}"
    "{{- ('\\n' if message['content'] or not loop.first else '')"
    " + '<tool_call>\\n{\"name\": ' + function['name'] | tojson"
    " + ', \"arguments\": ' + arguments + '}\\n</tool_call>' -}}"
    "{%- endfor -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- elif message['role'] == 'tool' -%}"
    "{%- if loop.first or messages[loop.index0 - 1]['role'] != 'tool' -%}{{- '<|im_start|>user' -}}{%- endif -%}"
    "{{- '\\n<tool_response>\\n' + message['content'] + '\\n</tool_response>' -}}"
    "{%- if loop.last or messages[loop.index0 + 1]['role'] != 'tool' -%}{{- '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- else -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)
