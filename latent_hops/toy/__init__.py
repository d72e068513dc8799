"""The shipped toy model and dataset: a synthetic knowledge graph, its tokenizer, its queries."""
