"""consortia.simulations"""
