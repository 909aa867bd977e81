"""Training FastVLM: data (LLaVA conversations, synthetic sets); the trainer follows."""
