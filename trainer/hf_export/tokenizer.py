"""Our tokenizer (trainer/data/tokenizer.py: tiktoken mergeable ranks, split pattern, nine specials) as a Hugging
Face fast tokenizer, with the chat template that renders our conversation format.

The BPE is converted by transformers' own `TikTokenConverter` (vocabulary and merges from the ranks, the split
pattern as a pre-tokenizer, byte-level decoding, the specials appended at the same ids). Two choices beyond it:
- a post-processor that puts `<|bos|>` first when special tokens are added (transformers' default), so
  `tok(text).input_ids` == our `encode(text, prepend_bos=True)`, what pretraining and CORE feed the model;
  `add_special_tokens=False` gives our plain `encode(text)`;
- special-token strings in text are special tokens (transformers' convention, which chat templates rely on);
  our `encode` reads them as plain text, as does the Hugging Face tokenizer with `split_special_tokens=True`.

`CHAT_TEMPLATE` renders what `Tokenizer.render_conversation` renders: `<|bos|>`, then per user turn
`<|user_start|>text<|user_end|>`, per assistant turn `<|assistant_start|>` + its text or parts (python calls
in `<|python_start|>…<|python_end|>`, tool output in `<|output_start|>…<|output_end|>`) + `<|assistant_end|>`;
a leading system message is joined to the first user message with a blank line; `add_generation_prompt`
ends with `<|assistant_start|>` (`render_for_completion`). Turns must alternate, user first.
The template renders text and the tokenizer encodes it, so two consecutive text parts of one assistant message
are encoded together where `render_conversation` encodes them one by one; every other conversation gives the
same ids token for token (tests/test_hf_export.py).
"""

from __future__ import annotations

CHAT_TEMPLATE = (
    "{%- set ns = namespace(system='', turn=0) -%}"
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] == 'system' -%}"
    "{%- set ns.system = message['content'] + '\\n\\n' -%}"
    "{%- else -%}"
    "{%- set want = 'user' if ns.turn % 2 == 0 else 'assistant' -%}"
    "{%- if message['role'] != want -%}"
    "{{- raise_exception('turns alternate, user first: message ' ~ loop.index0 ~ ' is from ' ~ message['role']) -}}"
    "{%- endif -%}"
    "{%- set ns.turn = ns.turn + 1 -%}"
    "{%- if want == 'user' -%}"
    "{{- '<|user_start|>' + ns.system + message['content'] + '<|user_end|>' -}}"
    "{%- set ns.system = '' -%}"
    "{%- else -%}"
    "{{- '<|assistant_start|>' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{{- part['text'] -}}"
    "{%- elif part['type'] == 'python' -%}{{- '<|python_start|>' + part['text'] + '<|python_end|>' -}}"
    "{%- elif part['type'] == 'python_output' -%}{{- '<|output_start|>' + part['text'] + '<|output_end|>' -}}"
    "{%- else -%}{{- raise_exception('unknown part type ' ~ part['type']) -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|assistant_end|>' -}}"
    "{%- endif -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant_start|>' -}}{%- endif -%}"
)


def to_tokenizers(tok):
    """A `tokenizers.Tokenizer` equal to `tok` (trainer.data.tokenizer.Tokenizer), `<|bos|>` added first."""
    from tokenizers import processors
    from transformers.convert_slow_tokenizer import TikTokenConverter

    class _FromRanks(TikTokenConverter):  # the converter reads a .tiktoken file; ours are in memory already
        @staticmethod
        def load_tiktoken_bpe(_url):
            return tok.mergeable_ranks

    out = _FromRanks(vocab_file="<memory>", pattern=tok.pattern, extra_special_tokens=tok.special_tokens).converted()
    for name, i in tok.special_tokens.items():
        if out.token_to_id(name) != i:
            raise ValueError(f"special token {name} got id {out.token_to_id(name)} in the conversion, ours is {i}")
    bos = "<|bos|>"
    out.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{bos} $A:0", pair=f"{bos} $A:0 {bos} $B:1",
                                      special_tokens=[(bos, tok.bos_id)]),
    ])
    return out


def to_transformers(tok, *, chat: bool, model_max_length: int):
    """A `PreTrainedTokenizerFast` of `tok` with its special tokens and the chat template.
    `chat`: an SFT model, whose replies end at `<|assistant_end|>` (eos); a base model's documents end at `<|bos|>`."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=to_tokenizers(tok), bos_token="<|bos|>",
        eos_token="<|assistant_end|>" if chat else "<|bos|>", pad_token="<|bos|>",
        additional_special_tokens=[s for s in tok.special_tokens if s != "<|bos|>"],
        chat_template=CHAT_TEMPLATE, model_max_length=model_max_length, clean_up_tokenization_spaces=False)
