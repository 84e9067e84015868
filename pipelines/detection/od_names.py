"""Our SSD network's variables under their Object Detection API checkpoint names.

The OD API's TF2 checkpoints name variables by object path: `model/_feature_extractor/classification_backbone/
layer_with_weights-N/...` (MobileNetV2, Keras-application layer order), `model/_feature_extractor/
_fpn_features_generator/...` and `_coarse_feature_layers/...` (FPNLite), `model/_box_predictor/...` (the
weight-shared head). `od_api_table` gives each of our variables that name: the backbone's layers map in
order (both are the Keras-application MobileNetV2), the rest by structure. A leaf module: the network
(ssd.py: which variables a freeze pattern names) and the checkpoint restores (zoo.py) both read it.
"""

from __future__ import annotations

import tensorflow as tf

SUFFIX = "/.ATTRIBUTES/VARIABLE_VALUE"
BACKBONE = "model/_feature_extractor/classification_backbone/"
FPN = "model/_feature_extractor/_fpn_features_generator/"
COARSE = "model/_feature_extractor/_coarse_feature_layers/"
PREDICTOR = "model/_box_predictor/"

# Which part of the network each OD API name belongs to (for summaries), in network order.
PARTS = [(BACKBONE, "backbone"), (FPN, "FPN"), (COARSE, "FPN"),
         (PREDICTOR + "_head_scope_conv_layers/", "box predictor tower"),
         (PREDICTOR + "_base_tower_layers_for_heads/", "box predictor tower"),
         (PREDICTOR + "_box_prediction_head/", "box predictor"),
         (PREDICTOR + "_prediction_heads/", "class predictor")]


def part_of(name: str) -> str:
    for prefix, part in PARTS:
        if name.startswith(prefix):
            return part
    return "other"


def _leaf_layers(layer) -> list:
    """Layers holding variables, in build order (nested blocks flattened)."""
    # Layers that own variables themselves (not through sublayers), in Keras' tracking order.
    return [sub for sub in layer._flatten_layers(include_self=False, recursive=True)  # noqa: SLF001
            if sub._trainable_weights or sub._non_trainable_weights]  # noqa: SLF001


def short_name(var) -> str:
    return var.name.split("/")[-1].split(":")[0]


def _layer_vars(prefix: str, layer) -> dict[str, tf.Variable]:
    return {f"{prefix}/{short_name(v)}{SUFFIX}": v for v in layer.weights}


def backbone_layers(model) -> list:
    """Our backbone's weighted layers, in the Keras-application MobileNetV2 order."""
    return _leaf_layers(model.backbone)


def od_api_table(model) -> dict[str, tf.Variable]:
    """{OD API checkpoint name: our variable} for every variable of our SSD network."""
    table: dict[str, tf.Variable] = {}
    for n, layer in enumerate(backbone_layers(model)):
        table.update(_layer_vars(f"{BACKBONE}layer_with_weights-{n}", layer))
    fpn = model.decoder
    table.update(_layer_vars(f"{FPN}top_layers/0", fpn.top))
    for i, (lateral, conv, norm) in enumerate(zip(fpn.laterals, fpn.smoothing, fpn.smoothing_norms)):
        table.update(_layer_vars(f"{FPN}residual_blocks/{i}/0", lateral))
        table.update(_layer_vars(f"{FPN}conv_layers/{i}/0", conv))
        table.update(_layer_vars(f"{FPN}conv_layers/{i}/1", norm))
    for i, (conv, norm) in enumerate(zip(fpn.coarse, fpn.coarse_norms)):
        table.update(_layer_vars(f"{COARSE}{i}/0", conv))
        table.update(_layer_vars(f"{COARSE}{i}/1", norm))
    head = model.head
    towers = [("PredictionTower" if head.share else "BoxPredictionTower", "box_encodings", head.box_tower,
               head.box_tower_norms)]
    if not head.share:
        towers.append(("ClassPredictionTower", "class_predictions_with_background", head.class_tower,
                       head.class_tower_norms))
    for scope, key, convs, norms in towers:
        for i, conv in enumerate(convs):
            table.update(_layer_vars(f"{PREDICTOR}_head_scope_conv_layers/{scope}/{i}", conv))
        for j, level_norms in enumerate(norms):
            for i, norm in enumerate(level_norms):
                # The tower is a list [conv, batch norm, activation] per layer: the norm is at 3i + 1.
                table.update(_layer_vars(f"{PREDICTOR}_base_tower_layers_for_heads/{key}/{j}/{3 * i + 1}", norm))
    table.update(_layer_vars(f"{PREDICTOR}_box_prediction_head/_box_encoder_layers/0", head.box_predictor))
    table.update(_layer_vars(
        f"{PREDICTOR}_prediction_heads/class_predictions_with_background/_class_predictor_layers/0",
        head.class_predictor))
    return table


def od_api_names(model) -> dict[int, list[str]]:
    """{id(our variable): [its OD API checkpoint name, without the '/.ATTRIBUTES...' suffix]}."""
    return {id(v): [name[:-len(SUFFIX)]] for name, v in od_api_table(model).items()}
