"""Box proposers behind one small interface (ultralytics, torchvision, given boxes)."""
