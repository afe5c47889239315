"""What scores a model variant: the scorer contract, perplexity, lm-eval tasks."""
