"""consortia.server"""
