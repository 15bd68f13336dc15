"""microfp: fingerprints of 3D microstructure volume elements and surrogates of their CP response."""

__version__ = "0.1.0"
