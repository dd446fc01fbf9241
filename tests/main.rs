mod segments;
mod index;
