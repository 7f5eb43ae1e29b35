"""Models: backbone split into stages, reconciliation, necks/heads, whole networks, export."""
from xlearner.models.backbone import Backbone, load_initial_weights
from xlearner.models.heads import ClsHead, ClsNeck, DetHead, FPNNeck, SegHead
from xlearner.models.nets import ExpandedNet, SharedNet, SourceSpec, TaskHeads, count_parameters
from xlearner.models.reconciliation import Reconciliation

__all__ = [
    "Backbone", "load_initial_weights", "ClsHead", "ClsNeck", "DetHead", "FPNNeck",
    "SegHead", "ExpandedNet", "SharedNet", "SourceSpec", "TaskHeads", "count_parameters", "Reconciliation",
]
