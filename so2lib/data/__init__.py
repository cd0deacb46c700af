"""Problems and their labels: synthetic tasks, word-problem sources, tokenizers, encoding and correct/incorrect labels, chain of thought, the embedded model's training."""
