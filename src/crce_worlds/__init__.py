"""Small worlds that run the product's code without real weights: the tiny random model
(tests), the offline CLIP tokenizer builder, and the toy shapes world (the demo)."""
