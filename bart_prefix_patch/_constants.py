"""Names shared by several layers, defined once."""

#: The three attention sites a prefix can reach, in the order of :class:`~bart_prefix_patch.Prefix`'s fields.
SITES = ("encoder", "decoder", "cross")

#: Submodule name of an attached prefix module (``model.bpp_prefix``); its ``state_dict`` keys start with it.
ATTACHED_NAME = "bpp_prefix"
