"""Realistic lists of parameter shapes, for the demo and the many-tensor benchmark."""


def resnet50_shapes():
    """The 161 parameter tensors of torchvision's ResNet-50 (25,557,032 elements)."""
    shapes = [(64, 3, 7, 7), (64,), (64,)]
    in_channels = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for block in range(blocks):
            out_channels = width * 4
            shapes += [(width, in_channels, 1, 1), (width,), (width,),
                       (width, width, 3, 3), (width,), (width,),
                       (out_channels, width, 1, 1), (out_channels,), (out_channels,)]
            if block == 0:
                shapes += [(out_channels, in_channels, 1, 1), (out_channels,),
                           (out_channels,)]
            in_channels = out_channels
    return shapes + [(1000, 2048), (1000,)]


def small_cnn_shapes():
    """A small CNN for 28x28 digits: two 3x3 convolutions (16 and 32 channels, each
    followed by 2x2 pooling) and a linear classifier (6 tensors, 20,490 elements)."""
    return [(16, 1, 3, 3), (16,), (32, 16, 3, 3), (32,), (10, 32 * 7 * 7), (10,)]


def transformer_shapes(layers=12, width=768, vocab=50257, context=1024):
    """A GPT-2-small-like stack: embeddings, then per block attention, MLP and norms."""
    shapes = [(vocab, width), (context, width)]
    for _ in range(layers):
        shapes += [(width,), (width,), (3 * width, width), (3 * width,), (width, width),
                   (width,), (width,), (width,), (4 * width, width), (4 * width,),
                   (width, 4 * width), (width,)]
    return shapes + [(width,), (width,)]
