"""The model core: everything that turns (query, passage) pairs into scores and a model into
a trained reranker, with no Ray import (`from raykit import Reranker` loads no `ray` module).

Loading (`loading`, `adapters`), tokenising (`tokenize`, `prompts`), batching (`batching`),
precision (`precision`), the scoring head and losses (`head`, `losses`), IR metrics
(`metrics`), the one inference engine (`engine`) and the Python API (`reranker`)."""
