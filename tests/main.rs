mod index;
mod segments;
