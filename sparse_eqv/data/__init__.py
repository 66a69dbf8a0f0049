"""Data: labelled frames, readers, neighbour lists and padded graph batches."""

from sparse_eqv.data.frames import Frame
from sparse_eqv.data.graph import GraphBudget, batch_graphs, frame_to_graph

__all__ = ["Frame", "GraphBudget", "batch_graphs", "frame_to_graph"]
