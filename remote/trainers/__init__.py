"""Trainers the agent can launch besides ai-toolkit.

``tiny`` (``python -m remote.trainers.tiny CONFIG.yaml``) is a real, small LoRA fit that runs on a
laptop CPU in seconds. It reads ai-toolkit's YAML, prints ai-toolkit's progress lines and writes
ai-toolkit's output layout, so the agent, the parser and the publisher cannot tell them apart.
Nothing here is imported by the agent itself: the trainer always runs as a child process, and
only that process imports torch.
"""
