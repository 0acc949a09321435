"""Training pipeline of the embedded default model (corpus, tokenizer, joint AR + diffusion objective)."""
