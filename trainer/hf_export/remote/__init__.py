"""The Hugging Face remote code shipped inside every export (`trust_remote_code=True`).

These two files are copied verbatim into the exported directory; they import only torch and transformers,
never llmctl, so an export loads anywhere transformers >= 5 is installed.
"""
