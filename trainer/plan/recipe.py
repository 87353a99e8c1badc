"""The recipe's constants: nanochat's hyperparameters and defaults, each with its source.

`trainer/plan/runplan.py` derives every number of a run from these and the spec's depth; nothing else in the
trainer invents a hyperparameter. The formulas, the reference's files and commits, and where we deviate on
purpose are written out in docs/recipe.md. Stdlib only, no imports: the CLI loads it on start-up.

Sources: karpathy/nanochat `scripts/base_train.py` defaults unless stated; `gpt.py` is `nanochat/gpt.py`;
"LOG" is the reference's `dev/LOG.md`, by date.
"""


ASPECT_RATIO = 64  # model_dim = depth * 64 (--aspect-ratio 64; LOG Jan 17: 64 beats 128 at 1e18 FLOPs)
HEAD_DIM = 128  # --head-dim 128 (LOG Jan 17: 128 beats 64); model_dim rounded up to a multiple of it
VOCAB_SIZE = 32_768  # 2^15: 256 bytes + 32,503 merges + 9 specials (tokenizer.py, since Jan 7 2026)
VOCAB_PAD = 64  # lm_head/wte rows padded to a multiple of 64 (gpt.py pad_vocab_size_to)
SEQ_LEN = 2048  # --max-seq-len
WINDOW_PATTERN = "SSSL"  # tiled over layers, last layer forced to L (gpt.py)
VE_GATE_CHANNELS = 12  # value-embedding gate reads x[..., :12] (gpt.py CausalSelfAttention)
SMEAR_GATE_CHANNELS = 24  # smear gate reads x[..., :24] (gpt.py, added Mar 14 2026)
RATIO = 12.0  # --target-param-data-ratio 12 (Mar 24 2026 re-run of the scaling laws)
REFERENCE_DEPTH = 12  # the batch/WD reference model: B_REF tokens at d12
B_REF = 2**19  # 524,288 tokens per step at d12 (base_train.py)
POWER_LINES_EXPONENT = 0.383  # B_opt ∝ D^0.383 (Bergsma et al., "Power Lines", arXiv 2505.13738)
WEIGHT_DECAY_REF = 0.28  # Muon weight decay at d12 (--weight-decay 0.28)
EMBEDDING_LR = 0.3  # --embedding-lr (AdamW, wte)
UNEMBEDDING_LR = 0.008  # --unembedding-lr (AdamW, lm_head)
MATRIX_LR = 0.02  # --matrix-lr (Muon)
SCALAR_LR = 0.5  # --scalar-lr (AdamW, x0 lambdas; resid lambdas get 0.01x)
VALUE_EMBED_LR_FRAC = 0.5  # value embeddings at half the embedding LR (gpt.py setup_optimizer)
RESID_LR_FRAC = 0.01  # resid_lambdas at 0.01 x scalar LR
SMEAR_LR = 0.2  # smear gate, smear/backout lambdas: fixed, not batch-scaled
LR_WIDTH_REF = 768  # AdamW embedding/unembedding LRs x (n_embd/768)^-0.5 (gpt.py setup_optimizer)
WARMUP_STEPS = 40  # --warmup-steps
WARMDOWN_RATIO = 0.65  # --warmdown-ratio: last 65% of steps decay linearly ...
FINAL_LR_FRAC = 0.05  # ... to 5% of the peak (--final-lr-frac)
MUON_MOMENTUM = (0.85, 0.97, 0.90)  # start, after warm-up, end of warmdown (base_train.get_muon_momentum)
MUON_MOMENTUM_WARMUP_STEPS = 400
EVAL_EVERY = 250  # val bpb cadence (--eval-every)
EVAL_TOKENS = 80 * 524_288  # tokens per val bpb pass (--eval-tokens)
CHECKPOINT_MINUTES = 20  # a dead pod costs at most this much work (nanochat saves only at the end)
KEEP_CHECKPOINTS = 3  # last K checkpoints kept per stage

# SFT (nanochat scripts/chat_sft.py): one epoch over the mixture, LRs inherited un-batch-scaled.
SFT_INIT_LR_FRAC = 0.8  # --init-lr-frac
SFT_WARMDOWN_RATIO = 0.5  # constant to 50% of the data, then linear ...
SFT_FINAL_LR_FRAC = 0.0  # ... to zero
SFT_MOMENTUM = (0.85, 0.95)  # Muon momentum 0.85 -> 0.95 over the first 300 steps
SFT_MOMENTUM_WARMUP_STEPS = 300
# The default mixture (SmolTalk 460K + 3 x MMLU aux 100K + 4 x GSM8K 8K, about 790K conversations) at
# an assumed ~500 tokens per conversation once best-fit packed with padding. Not measured by nanochat;
# override with RunSpec.sft_tokens when the mixture is known.
SFT_TOKENS = 400_000_000

# The eval stage (trainer/evaluate.py) scores the trained checkpoints after the training stages: val bpb and
# samples for each, CORE for the base model. It trains nothing; its time goes into the "evals" overhead.
STAGES = ("pretrain", "sft", "eval")
TRAINING_STAGES = ("pretrain", "sft")

# CORE (DCLM's 22 in-context-learning tasks, arXiv 2406.11794; nanochat nanochat/core_eval.py with the eval
# bundle's core.yaml). The names are fixed, so the metric `llmctl_core_task_centered{task}` stays bounded.
CORE_TASKS = (
    "hellaswag_zeroshot", "jeopardy", "bigbench_qa_wikidata", "arc_easy", "arc_challenge", "copa",
    "commonsense_qa", "piqa", "openbook_qa", "lambada_openai", "hellaswag", "winograd", "winogrande",
    "bigbench_dyck_languages", "agi_eval_lsat_ar", "bigbench_cs_algorithms", "bigbench_operators",
    "bigbench_repeat_copy_logic", "squad", "coqa", "boolq", "bigbench_language_identification",
)
