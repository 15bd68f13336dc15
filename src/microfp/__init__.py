"""microfp: fingerprints of 3D microstructure volume elements and surrogates of their CP response."""

from microfp.determinism import pin_cpu_kernels

# Before numpy or torch is imported anywhere: pin the math libraries' CPU kernels, so that every
# DVC output is the same to the bit on every host of one machine kind (see microfp.determinism).
pin_cpu_kernels()

__version__ = "0.1.0"
