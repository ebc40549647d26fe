"""Hard-negative mining (`raykit mine`) and first-stage BM25 runs (`raykit bm25`)."""
