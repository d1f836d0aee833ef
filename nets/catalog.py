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

# ResNet v2 with the book's bottleneck widths (16/64/128 in, 64/128/256 out); 1001 builds
# ~3300 layers (30.5 M parameters) and takes about a minute just to build on a CPU.
for _depth in (56, 110, 164, 1001):
    register(
        f"resnet{_depth}_v2",
        "nets.resnet:resnet_v2",
        depth=_depth,
        slow=_depth > 164,
        doc=f"ResNet-{_depth} v2, pre-activation bottlenecks (He et al. 2016), "
        f"{(_depth - 2) // 9} units/stage",
    )

# DenseNet-BC of the paper's CIFAR table (compression 0.5). No dropout by default: the book
# and the paper use 0.2 only without data augmentation, so a recipe that trains without it
# passes dropout=0.2. No L2 by default, as the book's listing; the paper recipe sets its
# weight decay through model_options.
for _depth, _k in ((100, 12), (250, 24), (190, 40)):
    register(
        f"densenet_bc_{_depth}_k{_k}",
        "nets.densenet:densenet_bc",
        depth=_depth,
        growth_rate=_k,
        compression=0.5,
        l2=0.0,
        slow=_depth > 100,
        doc=f"DenseNet-BC-{_depth}, k={_k}, theta=0.5 (Huang et al. 2017), "
        f"{(_depth - 4) // 6} layers/block",
    )

# Small MNIST-sized CNNs (nets/small.py) and the hand-sign ResNet-50 (nets/resnet50.py).
register(
    "mnist_cnn",
    "nets.small:mnist_cnn",
    input_shape=(28, 28, 1),
    num_classes=10,
    doc="3-conv MNIST CNN with max pooling and dropout (Atienza, Keras book listing 2.1)",
)
register(
    "ynet",
    "nets.small:ynet",
    input_shape=(28, 28, 1),
    num_classes=10,
    doc="Y-network: plain and dilated conv branches concatenated (Atienza, listing 2.2)",
)
register(
    "simple_cnn",
    "nets.small:simple_cnn",
    input_shape=(28, 28, 1),
    num_classes=10,
    doc="stride-2 conv-BN-ReLU stack down to 1x1 (fastai book, chapter 13)",
)
register(
    "resnet50",
    "nets.resnet50:resnet50",
    input_shape=(64, 64, 3),
    num_classes=6,
    doc="ResNet-50 for 64x64 SIGNS hand signs (He et al. 2015; deeplearning.ai tutorial)",
)
