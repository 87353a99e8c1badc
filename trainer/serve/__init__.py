"""Serving a trained run: `llmctl serve`'s Ray Serve app and what it is made of.

    app.py          the Ray Serve deployment: routes, SSE streaming, the chat page, health
    openai_api.py   the OpenAI request/response shapes, their validation and errors
    batching.py     continuous batching: many requests share each decode step
    engine.py       KV-cache inference: prefill once, sample continuations, stream tokens
    metrics.py      a replica's Prometheus metrics
    static/         the chat page (self-contained, no CDN)

The model and tokenizer come from trainer/run_loader.py, as for `llmctl chat` and the eval stage.
"""
