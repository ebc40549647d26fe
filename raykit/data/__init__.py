"""Reading and checking data: training groups (JSONL) and TREC/BEIR runs, qrels, corpora."""
