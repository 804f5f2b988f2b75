"""Gemma 4's turn format as data: markers, special tokens and their published ids, stop tokens, the tool syntax.

    <bos><|turn>system\\n<|think|>\\nSYSTEM<|tool>declaration:NAME{...}<tool|><turn|>\\n
    <|turn>user\\nTEXT<turn|>\\n
    <|turn>model\\n<|channel>thought\\nREASONING\\n<channel|><|tool_call>call:NAME{key:<|"|>v<|"|>}<tool_call|>
    <|tool_response>response:NAME{key:<|"|>v<|"|>}<tool_response|>TEXT<turn|>\\n

Sources (read 2026; the ids are the tokenizer's, the same in every size):
- Turn layout, thinking, tool syntax: the official chat template of google/gemma-4-E2B-it at revision 8995379
  (`TEMPLATE_REVISION`), shipped in TRL 1.16 as trl/chat_templates/gemma4_v5.jinja; its README names the revisions.
- The empty thought block: the 12B, 26B-A4B and 31B -it templates are that template plus, when thinking is off,
  `<|channel>thought\\n<channel|>` after the generation prompt's `<|turn>model\\n` (ollama keeps both as test fixtures,
  model/renderers/testdata/gemma4_{e2b,31b}_chat_template.jinja2; the model cards: "if thinking is disabled, the
  model will still generate the tags but with an empty thought block", except E2B/E4B).
- Stop tokens [<eos>, <turn|>, <|tool_response>] = ids [1, 106, 50]: the published generation_config.json files;
  transformers' GGUF loader restores the same three (modeling_gguf_pytorch_utils.py, Gemma 4 branch).
- <pad> 0, <eos> 1, <bos> 2 and the media token ids: transformers' Gemma4Config / Gemma4TextConfig defaults; the
  other ids: the published tokenizer.json `added_tokens`.
"""

from __future__ import annotations

TEMPLATE_REVISION = "google/gemma-4-E2B-it@899537982545a3e55ce64d34462b2efa5af85232"

BOS = "<bos>"
EOS = "<eos>"
TURN_START = "<|turn>"  # followed by the role and a newline
TURN_END = "<turn|>"  # followed by a newline; the model's end of turn (a stop token)
ROLES = ("system", "user", "model")  # a native system role, unlike Gemma 2/3
THINK = "<|think|>"  # first in the system turn: thinking on
CHANNEL_START = "<|channel>"
CHANNEL_END = "<channel|>"
THOUGHT_OPEN = CHANNEL_START + "thought\n"  # reasoning is written between these two
THOUGHT_CLOSE = "\n" + CHANNEL_END
EMPTY_THOUGHT = THOUGHT_OPEN + CHANNEL_END  # 12B/26B-A4B/31B, thinking off: after the generation prompt's header
TOOL_START = "<|tool>"  # a declaration, in the system turn
TOOL_END = "<tool|>"
TOOL_CALL_START = "<|tool_call>"
TOOL_CALL_END = "<tool_call|>"
TOOL_RESPONSE_START = "<|tool_response>"  # the model writes it after its calls and stops (a stop token)
TOOL_RESPONSE_END = "<tool_response|>"
STRING_DELIMITER = '<|"|>'  # wraps every string in the tool syntax (no escaping inside)
IMAGE = "<|image|>"  # media placeholders the official template writes for image/audio/video content parts
AUDIO = "<|audio|>"
VIDEO = "<|video|>"

# Published ids (see the sources above). A tiny test tokenizer puts the ids below 107 at the same places.
SPECIAL_TOKEN_IDS = {
    "<pad>": 0, EOS: 1, BOS: 2, "<unk>": 3, "<mask>": 4,
    TOOL_START: 46, TOOL_END: 47, TOOL_CALL_START: 48, TOOL_CALL_END: 49, TOOL_RESPONSE_START: 50,
    TOOL_RESPONSE_END: 51, STRING_DELIMITER: 52, THINK: 98, CHANNEL_START: 100, CHANNEL_END: 101,
    TURN_START: 105, TURN_END: 106,
    "<|image>": 255999, "<|audio>": 256000, IMAGE: 258880, AUDIO: 258881, "<image|>": 258882, "<audio|>": 258883,
    VIDEO: 258884,
}
STOP_TOKENS = (EOS, TURN_END, TOOL_RESPONSE_START)  # generation_config.json eos_token_id [1, 106, 50]

# Strings a Gemma 4 tokenizer reads as control tokens: inside content they would turn text into structure (a turn
# boundary, a thought, a tool call, the end of a tool string), so a row carrying one is refused. Gemma 2/3's and
# ChatML's markers too: in a Gemma 4 row they are a conversation rendered for another model. "<unused" covers the
# reserved tokens.
CONTROL_MARKERS = (TURN_START, TURN_END, THINK, CHANNEL_START, CHANNEL_END, TOOL_START, TOOL_END, TOOL_CALL_START,
                   TOOL_CALL_END, TOOL_RESPONSE_START, TOOL_RESPONSE_END, STRING_DELIMITER, BOS, EOS, "<pad>",
                   "<unk>", "<mask>", "<|image>", "<image|>", "<|audio>", "<audio|>", IMAGE, AUDIO, VIDEO,
                   "<|im_start|>", "<|im_end|>", "<start_of_turn>", "<end_of_turn>", "<unused")

# The tool syntax (the official template's format_argument / format_function_declaration):
#   call:NAME{key:VALUE,...}        keys sorted (case-insensitively), not quoted
#   response:NAME{key:VALUE,...}    a non-object response is response:NAME{value:VALUE}
#   declaration:NAME{description:<|"|>...<|"|>,parameters:{properties:{...},required:[...],type:<|"|>OBJECT<|"|>}}
# VALUE: strings wrapped in STRING_DELIMITER, true/false, null, numbers as Python writes them, [a,b], {k:v}.
# Inside declarations types are upper-cased and `enum` lists keep quoted keys.
PARAMETER_KEYS = ("description", "type", "properties", "required", "nullable")  # the template's standard_keys
