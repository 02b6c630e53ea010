"""Steps after a merge: continue training a (merged) LoRA adapter on a little data."""
