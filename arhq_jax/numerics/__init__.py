"""Numbers: the element codecs (E2M1, E4M3, E8M0) and the block-scaled formats (`FormatSpec`,
`QTensor`, quantize / dequantize / fake_quant).

Imports nothing of the library.
"""
