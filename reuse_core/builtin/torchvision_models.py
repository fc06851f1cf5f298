"""The torchvision classification models, by family, kept here so that registering and listing
the backbones never imports torchvision (a second or more of start-up: ``torchvision.ops``
pulls in ``torch._dynamo``).

A family is the torchvision module that defines the model's builder
(``torchvision.models.get_model_builder(name).__module__``, last part). Taken from torchvision
0.29 (``torchvision.models.list_models(module=torchvision.models)``: 80 models);
``tests/builtin/test_backbones.py`` checks the table against the installed torchvision, so an
upgrade that adds, removes or moves a model fails there: update the table then.
"""
from __future__ import annotations

FAMILIES: dict[str, tuple[str, ...]] = {
    "alexnet": ("alexnet",),
    "convnext": ("convnext_base", "convnext_large", "convnext_small", "convnext_tiny"),
    "densenet": ("densenet121", "densenet161", "densenet169", "densenet201"),
    "efficientnet": (
        "efficientnet_b0", "efficientnet_b1", "efficientnet_b2", "efficientnet_b3", "efficientnet_b4",
        "efficientnet_b5", "efficientnet_b6", "efficientnet_b7", "efficientnet_v2_l", "efficientnet_v2_m",
        "efficientnet_v2_s",
    ),
    "googlenet": ("googlenet",),
    "inception": ("inception_v3",),
    "maxvit": ("maxvit_t",),
    "mnasnet": ("mnasnet0_5", "mnasnet0_75", "mnasnet1_0", "mnasnet1_3"),
    "mobilenetv2": ("mobilenet_v2",),
    "mobilenetv3": ("mobilenet_v3_large", "mobilenet_v3_small"),
    "regnet": (
        "regnet_x_16gf", "regnet_x_1_6gf", "regnet_x_32gf", "regnet_x_3_2gf", "regnet_x_400mf", "regnet_x_800mf",
        "regnet_x_8gf", "regnet_y_128gf", "regnet_y_16gf", "regnet_y_1_6gf", "regnet_y_32gf", "regnet_y_3_2gf",
        "regnet_y_400mf", "regnet_y_800mf", "regnet_y_8gf",
    ),
    "resnet": (
        "resnet101", "resnet152", "resnet18", "resnet34", "resnet50", "resnext101_32x8d", "resnext101_64x4d",
        "resnext50_32x4d", "wide_resnet101_2", "wide_resnet50_2",
    ),
    "shufflenetv2": ("shufflenet_v2_x0_5", "shufflenet_v2_x1_0", "shufflenet_v2_x1_5", "shufflenet_v2_x2_0"),
    "squeezenet": ("squeezenet1_0", "squeezenet1_1"),
    "swin_transformer": ("swin_b", "swin_s", "swin_t", "swin_v2_b", "swin_v2_s", "swin_v2_t"),
    "vgg": ("vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn"),
    "vision_transformer": ("vit_b_16", "vit_b_32", "vit_h_14", "vit_l_16", "vit_l_32"),
}

# Model name -> family, sorted by name (the order of torchvision's list_models).
MODELS: dict[str, str] = dict(sorted((name, family) for family, names in FAMILIES.items() for name in names))
