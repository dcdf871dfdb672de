"""The bottom of the stack: partitioning (the mesh, THE logical-axis rules table, sharding
constraints, parameters created with logical axes) and the neural-network building blocks
every model family and the MoE library share (RMSNorm, RoPE, attention, SwiGLU,
embeddings). Imports nothing of the project but data-free numpy/jax/flax."""
