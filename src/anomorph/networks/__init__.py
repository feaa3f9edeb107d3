"""Plain ``torch.nn.Module`` networks: AE, VAE and the MorphAEus-style deformable AE.

Every network's ``forward`` returns a :class:`ModelOutput`. Displacements and velocities are
in pixels, channel k along spatial axis k (MONAI ``Warp`` convention).
"""
from anomorph.networks.autoencoder import AutoEncoder, Decoded, Decoder, Encoder, VariationalAutoEncoder
from anomorph.networks.blocks import disable_mc_dropout, enable_mc_dropout
from anomorph.networks.deformation import (
    PixelWarp,
    VelocityHead,
    VelocityIntegrator,
    integrate_velocity,
    jacobian_determinant,
    warp,
)
from anomorph.networks.factory import NETWORKS, build_network, network_arguments
from anomorph.networks.morphaeus import MorphAEus
from anomorph.networks.noncorrespondence import NonCorrespondenceNet
from anomorph.networks.outputs import ModelOutput

__all__ = [
    "AutoEncoder",
    "Decoded",
    "Decoder",
    "Encoder",
    "ModelOutput",
    "MorphAEus",
    "NonCorrespondenceNet",
    "NETWORKS",
    "PixelWarp",
    "VariationalAutoEncoder",
    "VelocityHead",
    "VelocityIntegrator",
    "build_network",
    "disable_mc_dropout",
    "enable_mc_dropout",
    "integrate_velocity",
    "jacobian_determinant",
    "network_arguments",
    "warp",
]
