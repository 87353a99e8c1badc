"""Data, named for what each module holds:

    shards.py      the shard layout (parquet, a text column, 1024-document row groups): listing, reading, writing
    corpus.py      where documents come from (HF datasets, jsonl/parquet/text, the offline sample corpus) -> shards
    tokenizer.py   the byte-level BPE: trained with rustbpe, served by tiktoken, stored as text/JSON; chat rendering
    pretrain.py    the pretraining loader: shards -> BOS-aligned best-fit (B, T) batches, exact resume
    sft.py         the SFT data: conversations -> masked, padded best-fit batches, exact resume
"""
