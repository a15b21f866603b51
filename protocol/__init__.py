"""What the compiler, the fleet and the agent must agree on: profiles, the bundle format, messages.

Nothing here imports the compiler, the fleet or the agent, so every side can depend on it.
"""
