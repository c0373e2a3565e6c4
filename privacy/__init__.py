"""consortia.privacy"""
