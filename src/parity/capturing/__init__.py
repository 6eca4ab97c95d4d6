"""Capturing activations: forward hooks on nn.Modules, explicit dumps, background writing.

(Named ``capturing`` so that it does not shadow the function ``parity.capture``.)
``parity.capturing.taps`` is torch-free (comparison uses its patterns); the other modules
import torch and load on first use.
"""
