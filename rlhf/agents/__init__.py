"""Agents: multi-turn episodes in which the model calls tools and environments between its turns.

tools.py holds the callables a model may call (TRL's `tools=[...]` contract) and runs one call;
environments.py the per-episode environment instances (TRL's `environment_factory` contract);
chat.py what the chat template and the tokenizer's response parser do for an episode; episodes.py
runs a batch of episodes on any rollout engine and collates them into a RolloutBatch.
"""
