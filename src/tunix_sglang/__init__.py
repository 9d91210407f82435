"""tunix-sglang: GRPO with Tunix and sglang-jax."""
