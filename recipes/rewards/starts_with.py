"""Example reward functions for `gemma2-tune rl` (TRL's signature: keyword arguments `prompts`, `completions`,
`completion_ids` and the dataset's other columns; one float per completion).

Conversational prompts make each completion a list with one message: completion[0]["content"] is its text
(without <end_of_turn>).
"""

WORD = "Hello"


def starts_with_word(completions, **kwargs):
    """1.0 for an answer whose first word is WORD (case and surrounding punctuation ignored), else 0.0."""
    rewards = []
    for completion in completions:
        words = completion[0]["content"].split()
        first = words[0].strip(".,!?;:'\"").lower() if words else ""
        rewards.append(1.0 if first == WORD.lower() else 0.0)
    return rewards


def brevity(completions, **kwargs):
    """Shorter answers score higher: 1 / (1 + words / 20), in (0, 1]."""
    return [1.0 / (1.0 + len(c[0]["content"].split()) / 20) for c in completions]
