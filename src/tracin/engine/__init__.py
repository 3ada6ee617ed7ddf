"""The scoring engine: capture, the scheduler over test chunks and train tiles, accumulators, resume
state, gradient stores, training-set sampling and sharding, and data loaders. It imports the layer
handlers (:mod:`tracin.layers`) and tasks, never the workflows."""
