"""Tree speculation: tree building, acceptance, cache surgery, the decoding loop and the generate route."""
