"""The shell: the `arhq-jax` command (`main`) and the demo.

May import everything.
"""
