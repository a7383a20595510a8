"""The names the scene probes take on the command line, kept free of torch so that ``aimpre --help`` stays fast."""

# the questions of the attribute probe (aimpre.eval.scenes.ATTRIBUTES gives each one's classes)
ATTRIBUTE_NAMES = ("count", "shape", "colour", "size", "row", "column", "background")
# how a probe reads the tokens (aimpre.eval.attributes)
READOUTS = ("attentive", "linear", "patch")
