"""The transformers block adapter: build a registry entry's tiny block, load canonical parameters
into it, observe its routing, losses and gradients. Below every backend and tool that runs a HF block."""
