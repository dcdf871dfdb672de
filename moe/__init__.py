"""Mixture-of-experts library: routers, dispatch/combine, stacked experts, expert parallelism.

Shape letters (as in core/layers.py): G routing groups, S tokens per group, D model
width, F expert hidden width, E experts, C capacity (tokens per expert per group), k top-k,
P token-expert pairs per group.

Data flow of one MoE layer:

    x [G, S, D] --router--> Routing (pairs token->expert with weights) + metrics
                --dispatch--> expert inputs --experts--> expert outputs --combine--> y [G, S, D]

Routing groups are defined by the data (a sequence, or a fixed number of tokens), never by
how the batch is sharded, so the computed function does not depend on the mesh.

  routing.py   routers, picked by name (ROUTERS), each `(logits or x) -> (Routing, metrics)`
  dispatch.py  capacity-based (drop overflow) and dropless (sort + ragged_dot) paths
  experts.py   stacked SwiGLU experts [E, D, F], shared experts, PR-MoE residual form
  layer.py     router + dispatch + experts as one nnx module returning (y, aux)
  parallel.py  expert parallelism: shard_map + all_to_all over the mesh axis 'expert';
               the per-device dropless layer of batch-sharded meshes
"""
