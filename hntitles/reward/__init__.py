"""The reward: what the reward server (`local_reward.py`) scores a title with, and the text measures around it.

- `scorers`: the offline MiniLM formula and its constants, and a trained Hugging Face reward model (+ PEFT);
- `embeddings`: all-MiniLM-L6-v2 sentence embeddings (the offline reward and the embedding validator);
- `text_metrics`: word count, copy fraction, ROUGE-L (`rouge-score`), title templates.
"""
