"""`llmctl chat RUN`: talk to a finished run's model, streamed token by token from a KV-cache engine.

Loads the run's newest whole SFT checkpoint (`--stage base`: the pretrained model; `--step N`: that step) from
the run's storage (a local path, file:// or s3:// through fsspec), renders the conversation exactly as SFT
rendered it (trainer/data/tokenizer.py `render_for_completion`), and streams the reply until `<|assistant_end|>`.
One-shot with `--prompt`; otherwise interactive, keeping the history (`/clear` starts over, `/quit` leaves).
Runs on CPU, or on a GPU when there is one. A missing run, checkpoint or stage is one line on stderr, exit 2.
The base model gets the bare text (BOS first) and continues it.

Examples:
  llmctl chat gpt-d4-2xcpu-1a2b3c4d --prompt "What does the json module do?"
  llmctl chat s3://bucket/runs/my-run --temperature 0 --max-tokens 128
"""

from __future__ import annotations

import argparse
import sys

from cli.errors import UsageError

STAGES = {"sft": "sft", "chat": "sft", "base": "pretrain", "pretrain": "pretrain"}  # --stage -> plan stage
HELP = "/clear starts a new conversation, /quit (or Ctrl-D) leaves"


def register(sub) -> None:
    p = sub.add_parser("chat", help="talk to a run's model (streams the reply)", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", metavar="RUN", help="run name (under --storage) or the run's URL/path")
    p.add_argument("-p", "--prompt", help="one message, one reply, exit (default: interactive)")
    p.add_argument("--stage", default="sft", choices=sorted(STAGES), help="sft/chat (default) or base/pretrain")
    p.add_argument("--step", type=int, help="checkpoint step (default: the newest whole one)")
    p.add_argument("-t", "--temperature", type=float, default=0.6, help="0 = greedy (default 0.6)")
    p.add_argument("-k", "--top-k", type=int, default=50, help="sample among the k likeliest tokens (default 50)")
    p.add_argument("-m", "--max-tokens", type=int, default=256, help="tokens per reply at most (default 256)")
    p.add_argument("--seed", type=int, default=42, help="sampling seed (default 42)")
    p.add_argument("--storage", default="file://~/.cache/llmctl", help="storage root where run names are looked up")
    p.add_argument("--device", default="auto", help="auto (GPU when present), cpu, cuda, cuda:N")
    p.set_defaults(func=cmd_chat)


def cmd_chat(args: argparse.Namespace) -> int:
    if not 0 <= args.temperature < float("inf"):
        raise UsageError(f"--temperature must be a finite number >= 0, got {args.temperature}")
    if args.top_k < 1 or args.max_tokens < 1:
        raise UsageError("--top-k and --max-tokens must be >= 1")
    session = Session.open(args)
    if args.prompt is not None:
        session.reply(args.prompt, sys.stdout)
        return 0
    return session.interactive(sys.stdin, sys.stdout)


class Session:
    """A loaded model, its tokenizer and engine, and the conversation so far."""

    def __init__(self, args, plan: dict, model, tokenizer, label: str) -> None:
        from trainer.serve.engine import Engine

        self.args, self.plan, self.model, self.tokenizer, self.label = args, plan, model, tokenizer, label
        self.chat = STAGES[args.stage] == "sft"
        self.engine = Engine.for_chat(model, tokenizer) if self.chat else Engine(model, stop_tokens=[tokenizer.bos_id])
        self.history: list[dict] = []
        self.turn = 0

    @classmethod
    def open(cls, args) -> Session:
        from trainer import run_loader
        from trainer.storage import run_url, storage_options_from_env

        url = run_url(args.run, args.storage)
        opts = storage_options_from_env() if url.startswith("s3") else {}
        try:  # plan.json is untrusted (shared storage): shape, stages and tokenizer checked before any allocation
            checked = run_loader.read_checked_plan(url, opts)
        except run_loader.RunLoadError as e:
            if str(e).startswith("no run at"):
                raise UsageError(f"run {args.run!r} not found: no plan.json at {url}") from None
            raise UsageError(f"run {args.run!r}: {e}") from None
        stage = STAGES[args.stage]
        if stage not in checked.stages:
            other = "base" if stage == "sft" else "sft"
            raise UsageError(f"run {checked.name} has no {stage} stage (it has "
                             f"{', '.join(checked.stages)}); try --stage {other}")

        from trainer.progress import spinner

        with spinner(True, f"loading {checked.name} ({stage})"):  # torch's import and the checkpoint: seconds
            try:
                run = run_loader.load_run(url, stage, args.step, storage_options=opts, device=args.device,
                                          checked=checked)
            except run_loader.RunLoadError as e:
                raise UsageError(str(e)) from None
        return cls(args, checked.plan, run.model, run.tokenizer, f"{checked.name} ({stage} step {run.step})")

    def prompt_ids(self, text: str) -> list[int]:
        """The conversation so far plus `text`, rendered as SFT rendered it, ending in <|assistant_start|>.
        The oldest turns are dropped while the prompt and a full reply would not fit the model's context; a
        message that alone leaves no room for a reply is refused (UsageError), never run past the context."""
        context = self.plan["arch"]["seq_len"]
        if len(text) > 16 * context:  # a token holds at most a few chars on average: refuse before encoding
            raise UsageError(f"the message is {len(text):,} characters; the model's context is {context} tokens")
        while True:
            if not self.chat:
                ids = self.tokenizer.encode(text, prepend_bos=True)
            else:
                conv = {"messages": [*self.history, {"role": "user", "content": text},
                                     {"role": "assistant", "content": ""}]}
                ids = self.tokenizer.render_for_completion(conv)
            if len(ids) + self.args.max_tokens <= context or not self.history:
                break
            self.history = self.history[2:]
        if len(ids) >= context:
            raise UsageError(f"the message is {len(ids):,} tokens with the conversation's markers; the model's "
                             f"context is {context} tokens: shorten it")
        return ids

    def reply_budget(self, ids: list[int]) -> int:
        """Tokens the reply may have: --max-tokens, cut so prompt + reply stay within the trained context."""
        return min(self.args.max_tokens, self.plan["arch"]["seq_len"] - len(ids))

    def reply(self, text: str, out) -> str:
        """Stream the reply to `text` to `out`; remember the exchange; return the reply."""
        from cli.console import clean
        from trainer.serve.engine import stream_text

        ids = self.prompt_ids(text)
        stop = self.engine.stop_tokens

        def tokens():
            for column in self.engine.generate(ids, max_tokens=self.reply_budget(ids),
                                               temperature=self.args.temperature, top_k=self.args.top_k,
                                               seed=self.args.seed + self.turn):
                if column[0] in stop:
                    return
                yield column[0]

        pieces = []
        try:
            for piece in stream_text(self.tokenizer, tokens()):
                pieces.append(piece)
                out.write(clean(piece, newlines=True))  # the model's bytes come from stored weights: no terminal escapes
                out.flush()
        except KeyboardInterrupt:  # Ctrl-C cuts the reply short, not the session
            out.write(" [interrupted]")
        out.write("\n")
        out.flush()
        reply = "".join(pieces).strip()
        self.turn += 1
        if self.chat:
            self.history += [{"role": "user", "content": text}, {"role": "assistant", "content": reply}]
        return reply

    def interactive(self, inp, out) -> int:
        out.write(f"llmctl chat: {self.label}. {HELP}.\n")
        out.flush()
        while True:
            out.write("you> ")
            out.flush()
            line = inp.readline()
            if not line:  # EOF (Ctrl-D, or the end of a pipe)
                out.write("\n")
                return 0
            text = line.strip()
            if not text:
                continue
            if text in ("/quit", "/exit"):
                return 0
            if text == "/clear":
                self.history, self.turn = [], 0
                out.write("(conversation cleared)\n")
                continue
            if text.startswith("/"):
                out.write(f"(unknown command {text.split()[0]}; {HELP})\n")
                continue
            out.write("assistant> ")
            try:
                self.reply(text, out)
            except UsageError as e:  # a message too long for the context: say so, keep the session
                out.write(f"({e})\n")
