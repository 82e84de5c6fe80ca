"""Slide-level classifiers on embedding grids: ``gridcnn``, ``abmil`` and ``linear``, behind one interface.

Every model is a :class:`SlideClassifier`: ``fit`` on bags of tile embeddings
(:class:`~wsi_encoder.io.embedding_store.SlideBag`) with integer labels and an optional inner
validation set, ``predict_proba`` → ``(n, k)`` class probabilities, ``heatmap`` → an ``(R, Q)`` map over
the slide's grid, and ``state_arrays`` / ``load_state_arrays`` (plain arrays, saved as safetensors,
never pickled). Models are made by name from a registry::

    model = create_slide_classifier("abmil", in_dim=128, num_classes=2, config={"epochs": 40})

The package: :mod:`.base` (the interface, registry and config rules), :mod:`.fit_loop` (the seeded
training loop with early stopping), :mod:`.torch_base` (``fit``/``predict_proba`` of the torch models,
written once over the hooks ``build_module`` and ``collate``), then one module per model:

* ``gridcnn`` (:mod:`.gridcnn`) — a CNN over the ``C × R × Q`` grid in the spirit of neural image
  compression (Tellez et al., TPAMI 2019); Grad-CAM heatmap.
* ``abmil`` (:mod:`.abmil`) — gated attention multiple-instance learning (Ilse, Tomczak & Welling,
  ICML 2018); the attention weights are the heatmap.
* ``linear`` (:mod:`.linear`) — mean- and max-pooled features into a logistic regression whose ``C`` is
  chosen on the validation set; heatmap: each tile's exact additive share of the slide's logit.

The torch models standardise their input with the training tiles' per-feature mean and standard
deviation, stored with the weights.
"""

from __future__ import annotations

from wsi_encoder.models.slide_classifiers.abmil import ABMILClassifier, ABMILConfig
from wsi_encoder.models.slide_classifiers.base import (
    FitInfo,
    SlideClassifier,
    config_fields,
    create_slide_classifier,
    list_slide_classifiers,
    make_config,
    model_preset,
    register_slide_classifier,
    slide_classifier_class,
)
from wsi_encoder.models.slide_classifiers.fit_loop import FitHistory, fit_module, torch_threads
from wsi_encoder.models.slide_classifiers.gridcnn import GridCNNClassifier, GridCNNConfig
from wsi_encoder.models.slide_classifiers.linear import LinearConfig, LinearPooledClassifier
from wsi_encoder.models.slide_classifiers.torch_base import TorchSlideClassifier
from wsi_encoder.models.slide_networks import GatedAttentionMIL, GridCNN

__all__ = [
    "ABMILClassifier",
    "ABMILConfig",
    "FitHistory",
    "FitInfo",
    "GatedAttentionMIL",
    "GridCNN",
    "GridCNNClassifier",
    "GridCNNConfig",
    "LinearConfig",
    "LinearPooledClassifier",
    "SlideClassifier",
    "TorchSlideClassifier",
    "config_fields",
    "create_slide_classifier",
    "fit_module",
    "list_slide_classifiers",
    "make_config",
    "model_preset",
    "register_slide_classifier",
    "slide_classifier_class",
    "torch_threads",
]
