"""Every registered variant, stated as numbers. Importing this module imports no Keras."""

from nets.registry import register

# The depths of the ResNet paper's CIFAR-10 table; 1202 (19.4 M parameters) is too slow for CI.
for _depth in (20, 32, 44, 56, 110, 1202):
    register(
        f"resnet{_depth}_v1",
        "nets.resnet:resnet_v1",
        depth=_depth,
        slow=_depth > 110,
        doc=f"ResNet-{_depth} v1 for CIFAR-10 (He et al. 2015), {(_depth - 2) // 6} units/stage",
    )
