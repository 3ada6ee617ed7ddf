"""The image-classification workflow: image folders, models, training with checkpoints, the influence
job, and the generated data sets (digits, shapes, label noise)."""
