"""Column names the stages pass between them, in one place.

Names starting with ``_`` are internal: they ride between stages and never reach an output file.
"""

DOC_ID = "doc_id"
TEXT = "text"
# read
ORDER = "_order"  # (file index << 40) | row: where a row came from, and a stable order
ID_HASH = "_id_hash"
REASON = "reject_reason"
TEXT_TRUNCATED = "text_truncated"
# embed
EMBEDDING = "embedding"
TOKEN_IDS = "_token_ids"  # encoder input ids per document (tokenize -> embed)
TEXT_HASH = "_text_hash"
# cluster
CLUSTER_ID = "cluster_id"
DISTANCE = "distance"
RAND_KEY = "_rand_key"  # seeded per-document key: the diverse share and every tie-break
# cluster, when labels exist: the task model's view of every document (ops/task_model.py)
MARGIN = "margin"  # top-1 minus top-2 class probability; small = uncertain
PREDICTED_LABEL = "predicted_label"
# candidates
CANDIDATE_REASON = "candidate_reason"
# score
SCORE_IDS = "_score_ids"  # scoring LLM input ids per document (score tokenize -> score, on GPU runs)
SCORE_TRUNCATED = "_score_truncated"
SCORE_COLUMNS = ("uncertainty", "max_entropy", "nll", "n_tokens", "truncated")
# score, with a task prompt and choices (score.task): the LLM's answer over the label names
LLM_LABEL = "llm_label"  # most probable choice (calibrated)
LLM_MARGIN = "llm_margin"  # top-1 minus top-2 choice probability
LLM_PROBS = "llm_probs"  # list<float32>, in score.task.choices order
LLM_COLUMNS = (LLM_LABEL, LLM_MARGIN, LLM_PROBS)
# select
RULE = "rule"  # the rule that picked a selected document: "audit", one of select.rules, or "cold_start"
SELECTED_COLUMNS = (
    "doc_id", "rank", "cluster_id", "cluster_size", "uncertainty", "nll", "n_tokens",
    "distance_to_centroid", "reason", "predicted_label", "margin", RULE,
)
