"""Hugging Face export vs our own model, engine and tokenizer: the figures docs/export.md quotes.

A model of the local run's shape (d4: 256 wide, head_dim 64, windows 128/128/128/512, so the sliding windows
bite at 512 tokens) with random unit-scale weights, and a 4,096-token BPE trained here on Python's own
documentation (trainer/data/corpus.py `iter_python_docs`, the offline sample corpus). Exported with
trainer/hf_export/export.py, loaded with transformers (`trust_remote_code=True`, CPU, float32). Prints:
- the largest |logit difference| on a 4 x 512 batch of held-out text, for the sdpa and eager attention;
- greedy `generate` against the engine: tokens equal out of those generated;
- the tokenizer: held-out documents (and the tests' mixed corpus) encoded to the same ids, tokens compared;
- chat templates against `render_conversation` (tests/test_hf_export.py's conversations);
- the time to export and to load.

`--vocab 32768 --train-docs 60000` measures the recipe's vocabulary (the tokenizer conversion's time grows with it).

Run: .venv/bin/python bench/hf_export.py [--docs 400] [--vocab 4096] [--train-docs 3000] [--threads 1]
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository: bench, tests


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=400, help="held-out documents for the tokenizer comparison")
    ap.add_argument("--vocab", type=int, default=4096, help="BPE vocabulary trained for the comparison")
    ap.add_argument("--train-docs", type=int, default=3000, help="documents the BPE is trained on")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bench.decode import random_model
    from tests.test_hf_export import CONVERSATIONS, CORPUS
    from trainer.data.corpus import iter_python_docs
    from trainer.data.tokenizer import Tokenizer
    from trainer.hf_export.export import export_model
    from trainer.hf_export.tokenizer import to_tokenizers
    from trainer.serve.engine import Engine

    docs = list(itertools.islice(iter_python_docs(), args.train_docs + args.docs))
    train, held = docs[:args.train_docs], docs[args.train_docs:]
    tok = Tokenizer.train(train, args.vocab)
    model = random_model(4, 512, tok.vocab_size, 64)
    print(f"model: d4, windows {model.arch.windows}, vocab {tok.vocab_size}, random unit-scale weights")

    t = time.perf_counter()
    to_tokenizers(tok)
    print(f"tokenizer conversion (vocab {tok.vocab_size:,}): {time.perf_counter() - t:.2f} s")
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        export_model(model, tok, f"{tmp}/m", chat=True)
        t_export = time.perf_counter() - t
        t = time.perf_counter()
        hf = {impl: AutoModelForCausalLM.from_pretrained(f"{tmp}/m", trust_remote_code=True, dtype=torch.float32,
                                                         attn_implementation=impl).eval() for impl in ("sdpa", "eager")}
        t_load = (time.perf_counter() - t) / 2
        hft = AutoTokenizer.from_pretrained(f"{tmp}/m", trust_remote_code=True)
    print(f"export {t_export:.2f} s, load {t_load:.2f} s")

    stream = [t for ids in tok.encode_batch(held, prepend_bos=True) for t in ids]  # documents back to back
    rows = [stream[i * 512:(i + 1) * 512] for i in range(4)]
    batch = torch.tensor(rows)
    with torch.no_grad():
        ours = model(batch)
        for impl, m in hf.items():
            print(f"logits {tuple(batch.shape)} {impl}: max |ours - transformers| = "
                  f"{(ours - m(batch).logits).abs().max().item():.3g} (logit scale {ours.abs().max().item():.3g})")

    prompt = rows[0][:16]  # starts with <|bos|>
    want = Engine(model).generate_batch(prompt, max_tokens=args.new_tokens, temperature=0.0)[0]
    with torch.no_grad():
        # the attention mask as the tokenizer returns it: pad is <|bos|>, so with eos overridden (None here, to
        # run the whole length) generate would otherwise take the leading <|bos|> for left padding
        got = hf["sdpa"].generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                  max_new_tokens=args.new_tokens, do_sample=False,
                                  eos_token_id=None)[0, len(prompt):].tolist()
    same = sum(a == b for a, b in zip(got, want))
    print(f"greedy generate: {same}/{len(want)} tokens equal to the engine's, prefix {len(prompt)} tokens")

    texts = held + CORPUS
    n_same = n_tok = n_texts = 0
    for text in texts:
        a, b = tok.encode(text), hft(text, add_special_tokens=False)["input_ids"]
        n_texts += a == b
        n_tok += len(a)
        n_same += sum(x == y for x, y in zip(a, b)) if len(a) == len(b) else 0
    print(f"tokenizer: {n_texts}/{len(texts)} texts identical, {n_same}/{n_tok} tokens "
          f"({100 * n_same / max(n_tok, 1):.2f}%)")
    chats = sum(hft.apply_chat_template(c["messages"])["input_ids"] == tok.render_conversation(c, 1 << 30)[0]
                for c in CONVERSATIONS)
    print(f"chat template: {chats}/{len(CONVERSATIONS)} conversations token for token")


if __name__ == "__main__":
    main()
